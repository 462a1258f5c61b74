import sys

from lis.cli import main

sys.exit(main())
