"""Measuring optimizers on real tasks (imported lazily; needs the task's extras)."""
