import sys

from hf_specdef.cli import main

sys.exit(main())
