import sys

from hovle.train.cli import main

sys.exit(main())
