"""``python -m hitl_service`` runs the ``hitl-service`` command."""

import sys

from hitl_service.cli import main

sys.exit(main())
