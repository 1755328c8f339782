import sys

from cpjump1.cli import main

sys.exit(main())
