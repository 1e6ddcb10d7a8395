import sys

from gpumerge.cli import main

sys.exit(main())
