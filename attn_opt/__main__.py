import sys

from attn_opt.tools.cli import main

sys.exit(main())
