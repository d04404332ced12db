"""`python -m sngm_integrations.study`: the same as the `sngm-study` command."""

import sys

from sngm_integrations.study.cli import main

sys.exit(main())
