import sys

from logitfuse.family.train import main

sys.exit(main())
