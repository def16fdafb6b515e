"""The frozen holdout, and the development split made beside it.

The holdout is the only place where reported metrics and model comparisons are measured, so every
candidate and the champion see the same images, and no choice (epoch, threshold, calibration) has
touched them. It is a manifest of its own, ``dataset/holdout/<hash>.json`` (entries with role
``holdout``), and it changes only through explicit commands, each logged in ``holdout_events``
(who, when, why, hash before and after, counts):

* :func:`freeze_holdout` chooses it once from the labelled store: group-aware (a patient never sits
  in two roles) and stratified. The first split freezes one itself when there is none yet
  (``holdout_fraction``), logged like any other freeze.
* :func:`extend_holdout` adds labelled images from a folder laid out like ``landing/<label>/[<group>/]``.
  Those images go into the store as holdout images and never enter development; the folder is read,
  never changed.
* :func:`withdraw_from_holdout` takes images out (kept out from then on, with the reason): named ones, or
  every image whose label is contested (intake saw its content under the other label: :func:`contested`,
  which ``bcc holdout show`` and intake report; intake never changes the holdout itself).

New labelled data that arrives through ``landing/`` goes to development, never into the holdout.

Kept out of the holdout, with the reason recorded in its manifest (``excluded``): near-duplicates of a
development image (:mod:`bcc_pipeline.neardup`), exact copies of an image already in the store, and
images of a patient group that already has development images. Kept out of development, with the
reason in :func:`split_roles`' result: near-duplicates of a holdout image and images of a patient in
the holdout. Excluded images are used by no role.

The package, by job: :mod:`.records` reads the holdout (its log, its manifest, the description for
people) and the labelled images it is drawn from; :mod:`.changes` freezes, extends and withdraws from it,
with :mod:`.extend_folder` reading a folder given to extend (and what in it is under both labels);
:mod:`.roles` makes the development split beside it.
"""

from .changes import extend_holdout, freeze_holdout, withdraw_from_holdout
from .records import contested, current_holdout, describe_holdout
from .roles import AUTO_FREEZE_REASON, RoleSplit, split_roles

__all__ = [
    "AUTO_FREEZE_REASON",
    "RoleSplit",
    "contested",
    "current_holdout",
    "describe_holdout",
    "extend_holdout",
    "freeze_holdout",
    "split_roles",
    "withdraw_from_holdout",
]
