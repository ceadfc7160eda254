// Checks microadam_cpu.cpp's kth_largest (the radix select of Top-K) against a sort, on
// random key sets of every shape the step can hand it: few or many candidates, narrow or wide value
// ranges (heavy ties included), threshold 0. Built and run by tests/test_cpu_kernel.py, which
// includes the kernel's source so that the function in its anonymous namespace is visible here.
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

int main() {
  std::mt19937 rng(1);
  Scratch S;
  S.reserve(4096, 4096, 64, 640, false, 128, 4096 / 128, 1);
  long bad = 0, cases = 0;
  for (int it = 0; it < 100000; ++it) {
    const int c = 1 + int(rng() % 300);
    const int k = 1 + int(rng() % uint32_t(c));
    const int mode = int(rng() % 4);
    std::vector<uint32_t> keys(size_t(c) + 16);
    const uint32_t base = rng() & 0x7FFFFFFFu;
    const uint32_t span = mode == 0 ? 4u : mode == 1 ? 1000u : mode == 2 ? (1u << 23) : 0x7FFFFFFFu;
    for (int i = 0; i < c; ++i) keys[size_t(i)] = uint32_t(std::min<uint64_t>(0x7FFFFFFFull, uint64_t(base) + rng() % span));
    const uint32_t mkey = *std::max_element(keys.begin(), keys.begin() + c);
    const uint32_t lowest = *std::min_element(keys.begin(), keys.begin() + c);
    const uint32_t t = mode == 3 ? 0u : lowest - std::min<uint32_t>(lowest, rng() % 100);
    std::vector<uint32_t> sorted(keys.begin(), keys.begin() + c);
    std::sort(sorted.begin(), sorted.end(), std::greater<uint32_t>());
    const uint32_t got = kth_largest(keys.data(), c, k, t, mkey, S);
    ++cases;
    if (got != sorted[size_t(k - 1)] && bad++ < 5)
      std::printf("c=%d k=%d t=%u mkey=%u: got %u, want %u\n", c, k, t, mkey, got, sorted[size_t(k - 1)]);
  }
  std::printf("%ld wrong of %ld\n", bad, cases);
  return bad != 0;
}
