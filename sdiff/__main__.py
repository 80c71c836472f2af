import sys

from sdiff.cli import main

sys.exit(main())
