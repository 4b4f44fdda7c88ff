"""``python -m lit_webssl``: see :mod:`lit_webssl.cli`."""

from lit_webssl.cli import main

if __name__ == "__main__":
    main()
