import sys

from fcit_hpc.cli import main

sys.exit(main())
