"""``python -m deepalign ...`` (and ``torchrun ... -m deepalign train ...``): the command line."""

from deepalign.cli.app import main

if __name__ == "__main__":
    main()
