"""UA-VLS (Das et al., WACV 2026) as a MONAI bundle: the method's own code.

Modules
-------
* :mod:`scripts.ssmix`    -- State Space Mixer, eq. 13-19 (selective scan: mamba_ssm kernel or pure PyTorch).
* :mod:`scripts.modab`    -- Modality Decoding Attention Block, eq. 3-12.
* :mod:`scripts.network`  -- the full network (encoders eq. 1-2, decoder eq. 20-25).
* :mod:`scripts.losses`   -- Spectral-Entropic Uncertainty loss, eq. 26-29.
* :mod:`scripts.handlers` -- training/evaluation helpers (early stopping with a minimum number of epochs,
  learning curve + metrics JSON).
* :mod:`scripts.workflow` -- data lists for train / evaluate / inference and inference-time file outputs.

Shared code (tokenizers, text encoders, transforms, inferer, metrics, plots) lives in the ``vlseg`` package.
"""
