# vlseg MONAI Label app
