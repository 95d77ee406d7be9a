"""The demo's CPU launcher: :mod:`scoredistill.testing.cpu_launch` under the name the demo runs
(``python -m scoredistill.demo.cpu_launch launch.py --config ... --train ...``)."""
from ..testing.cpu_launch import (PROGRESS_ENV, STUB_NAMES, STUBS, StubFinder, install,  # noqa: F401
                                  install_import_hooks, main)

if __name__ == "__main__":
    main()
