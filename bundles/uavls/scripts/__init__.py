"""UA-VLS (Das et al., WACV 2026, arXiv 2602.14498) as a MONAI bundle: the method's own code.

Equation numbers are the paper's.

Modules
-------
* :mod:`scripts.network`  -- the full network: ConvNeXt image encoder (eq. 1), frozen BERT text encoder (eq. 2),
  three decoder stages (MoDAB + UNETR up-block, eq. 3-21), sub-pixel head (eq. 22-25); pretrained files loaded
  strictly (``require_pretrained``) and the tokenizer checked against the text encoder's vocabulary.
* :mod:`scripts.modab`    -- Modality Decoding Attention Block, eq. 3-12.
* :mod:`scripts.ssmix`    -- State Space Mixer, eq. 13-19 (selective scan: mamba_ssm kernel or pure PyTorch).
* :mod:`scripts.losses`   -- Spectral-Entropic Uncertainty loss, eq. 26-29.
* :mod:`scripts.convnext_weights` -- ImageNet ConvNeXt checkpoints (timm, transformers, original) -> timm names.
* :mod:`scripts.handlers` -- early stopping with a minimum number of epochs.
* :mod:`scripts.workflow` -- data lists for train / evaluate / inference.

Shared code (tokenizers, text encoders, weights loading, transforms, inferer, metrics, training reports, output
writers) lives in the ``vlseg`` package.
"""
