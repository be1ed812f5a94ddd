import sys

from logitfuse.training.family.train import main

sys.exit(main())
