import sys

from nas_run.cli import main

sys.exit(main())
