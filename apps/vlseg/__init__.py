# vlseg MONAI Label app (see README.md)
