import sys

from covid_cxr.cli import main

sys.exit(main())
