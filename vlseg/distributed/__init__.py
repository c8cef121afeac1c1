"""Scale-out jobs on torch.distributed (``torchrun``): pool scoring and batch inference over many images."""
