import sys

from lunaris.cli import main

sys.exit(main())
