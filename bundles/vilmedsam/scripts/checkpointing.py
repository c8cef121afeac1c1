"""Checkpoints that hold what training produced, not copies of the pretrained files (as the public code saves LoRA
and decoder only).

Rule: a checkpoint holds a tensor iff it is trainable OR it was not loaded from a pretrained file. So

* paper configuration (SAM and CLIP files loaded, frozen): LoRA + decoder only (``model.pt`` and the full-state
  checkpoints alike, since both call ``state_dict``); the frozen parts come back from the pretrained files, which
  inference therefore needs (``require_pretrained: true``);
* a variant without pretrained files (``small`` / ``tiny``), or an encoder unfrozen by ``train_encoders``: every
  such tensor is saved, so a checkpoint never depends on a random initialisation being reproduced.

Loading (``load_state_dict``, what MONAI's ``CheckpointLoader`` calls) is strict for everything the checkpoint must
hold; only the tensors this instance restored from files may be absent (present ones, e.g. from an older full
checkpoint, are loaded). A checkpoint lacking tensors this instance did NOT load from files -- e.g. one trained with
pretrained files, used without them -- fails with a message saying so.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.nn.modules.module import _IncompatibleKeys

__all__ = ["PretrainedAwareState"]


class PretrainedAwareState:
    """Mixin for an ``nn.Module`` (listed before it): :meth:`mark_from_files` records the tensors loaded from
    pretrained files; ``state_dict`` leaves out those that are still frozen; ``load_state_dict`` accepts their
    absence."""

    def mark_from_files(self, prefix: str, names: Iterable[str]) -> None:
        if "_from_files" not in self.__dict__:
            self.__dict__["_from_files"] = set()
        self.__dict__["_from_files"].update(prefix + n for n in names)

    def restorable_from_files(self) -> set[str]:
        """Names (relative to this module) of frozen tensors that came from pretrained files."""
        marked = self.__dict__.get("_from_files", set())
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n for n in marked if n not in trainable}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self.restorable_from_files():
            state.pop(prefix + name, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        skip = self.restorable_from_files()
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if k not in skip]
        if strict and (missing or unexpected):
            hint = (" The checkpoint was probably saved by a network whose frozen SAM / CLIP parts came from the "
                    "pretrained files, which are not loaded now: set `require_pretrained: true` and fetch them "
                    "(see the bundle's large_files.yml)." if missing else "")
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: {len(missing)} missing keys (e.g. "
                f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}).{hint}")
        return _IncompatibleKeys(missing, unexpected)
