"""``python -m holons`` (also what ``torchrun -m holons`` runs)."""

from holons.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
