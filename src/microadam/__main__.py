import sys

from microadam.cli import main

sys.exit(main())
