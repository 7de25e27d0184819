"""``python -m reprokit``: the command line; under torchrun, a rank that skips interpreter finalization."""

import os
import sys
import traceback

from reprokit.cli import main


def _rank_main() -> None:
    """A rank under torchrun (``reprokit train --nproc N``) ends with ``os._exit`` after flushing:
    gloo aborts a rank now and then when a process group an object still holds (DDP's) is destroyed
    during interpreter finalization (see tests/fixtures/dist/torchrun_check.py)."""
    code = 1
    try:
        code = main()
    except SystemExit as e:  # argparse, a finished run (0), a stopped one (reprokit.run.EXIT_STOPPED)
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter would print, and exit 1 for
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
    _rank_main()
else:
    sys.exit(main())
