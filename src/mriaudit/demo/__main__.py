"""``python -m mriaudit.demo OUTDIR``: see ``mriaudit.demo.generate.main``."""

from mriaudit.demo.generate import main

if __name__ == "__main__":  # worker processes import this module too
    raise SystemExit(main())
