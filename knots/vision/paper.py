"""The paper's vision protocol as the authors' code fixes it (gstoica27/KnOTS at ``AUTHORS_COMMIT``).

Data only: the finetuned accuracies the authors divide by (the ``paper`` normalizers), the official
validation / test sizes, the index files behind their validation splits, and their ViT-L/14 epochs.
Every value cites the authors' file; docs/vision_reference_protocol.md has the table with lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from knots.errors import ConfigError

AUTHORS_REPO = "gstoica27/KnOTS"
AUTHORS_COMMIT = "baa35e85768b8841820d35edc3e41b25304248c5"
#: The eight tasks, in the paper's order (project task names).
TASKS = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")

#: Finetuned test accuracies (%) of the authors' rank-16 LoRA models, by which they divide merged
#: accuracies on validation and test alike (eval_scripts/8vision_pertask_linearsearch.py:
#: ``fine_tuned_acc_rank16`` for ViT-B/32, ``fine_tuned_acc_rank16_ViTL14`` for ViT-L/14).
FINETUNED_ACCURACY: dict[str, dict[str, float]] = {
    "ViT-B-32": {"cars": 74.0, "dtd": 58.3, "eurosat": 99.0, "gtsrb": 92.7, "mnist": 99.3, "resisc45": 88.4,
                 "sun397": 64.5, "svhn": 96.2},
    "ViT-L-14": {"cars": 99.76682729675113, "dtd": 70.0531914893617, "eurosat": 98.59259259259259,
                 "gtsrb": 97.19912905779889, "mnist": 99.525, "resisc45": 95.69841269841269,
                 "sun397": 79.59697732997482, "svhn": 97.72399884759435},
}

#: Epochs per task of the authors' ViT-L/14 adapters (lr 3e-4, weight decay 1e-4, no label smoothing),
#: from the checkpoint names in configs/vitL_r16_*.py.
VITL14_EPOCHS = {"cars": 15, "dtd": 15, "eurosat": 8, "gtsrb": 5, "mnist": 2, "resisc45": 7, "sun397": 8, "svhn": 5}

#: Fraction of the test split the authors' permutations turn into validation: ``int(0.2 * n)`` images.
VALIDATION_FRACTION = 0.2

#: How the authors' loaders order a test split, which their permutations index:
#: ``dataset`` (the source's own order: MNIST's IDX file, SVHN's .mat file), ``file_name`` (by image
#: file name: Stanford Cars' annotation file and GTSRB's GT-final_test.csv list the test images in
#: file-name order) or ``label_file_name`` (torchvision ImageFolder: class folders in sorted order, then
#: file names; SUN397's folders sort in the order of its labels).
TEST_ORDERS = ("dataset", "file_name", "label_file_name")


@dataclass(frozen=True)
class ReferenceSplit:
    """Validation and test of one task as the authors made them.

    ``index_file`` (in their ``dataset/shuffled_idxs/``) is a permutation of the test split: the
    first ``int(0.2 n)`` indices are validation, the rest test; ``sha256`` is the file's checksum
    at ``AUTHORS_COMMIT``. Without an index file, the dataset's own validation split is used and
    ``mirror`` names a Hugging Face dataset that carries it.
    """

    validation: int
    test: int
    index_file: str | None = None
    sha256: str | None = None
    test_order: str = "dataset"
    mirror: str | None = None

    @property
    def permutation_length(self) -> int:
        """The number of test-split images a permutation covers."""
        return self.validation + self.test


#: Official sizes: the test sizes are those the ViT-L/14 normalizers are fractions of (99.76682...% =
#: 6418 / 6433 for Cars, and so on); the permutation lengths are those of the index files.
REFERENCE_SPLITS: dict[str, ReferenceSplit] = {
    "cars": ReferenceSplit(1608, 6433, "cars_shuffled_idxs.pt",
                           "e1b796ecd96766e13b10a404ed62dbf317c55fb54a920dcbba60ce0622c77ffc", "file_name"),
    "dtd": ReferenceSplit(1880, 1880, mirror="mcimpoi/dtd_split_1"),
    "eurosat": ReferenceSplit(2700, 2700, mirror="Honaker/eurosat_dataset"),
    "gtsrb": ReferenceSplit(2526, 10104, "gtsrb_shuffled_idxs.pt",
                            "e836ee60484903d73dcb851971272ddb6d9e89f547f7a828beea2f1a358ce981", "file_name"),
    "mnist": ReferenceSplit(2000, 8000, "mnist_shuffled_idxs.pt",
                            "6a423371da9c1755dd564fa2c8d2af52ce0a995b0a8ba9a670a80b27aaa59020"),
    "resisc45": ReferenceSplit(6300, 6300, mirror="timm/resisc45"),
    "sun397": ReferenceSplit(3970, 15880, "sun397_shuffled_idxs.pt",
                             "f7c27066c87ea6a37fbbe590abcfa88c2e683abb02fec4c421788e0d4eafb1c4", "label_file_name"),
    "svhn": ReferenceSplit(5206, 20826, "svhn_shuffled_idxs.pt",
                           "3d8debea401e5b21ceb2e9a2bb814025c23d4bcde813714cfca6138ab9a3d826"),
}


def reference_split(task: str) -> ReferenceSplit:
    """The authors' split of ``task``; a one-line error for a task outside the paper's eight."""
    if task not in REFERENCE_SPLITS:
        raise ConfigError(f"no reference split for task {task!r}; the paper's tasks are {', '.join(TASKS)}")
    return REFERENCE_SPLITS[task]


def paper_normalizers(arch: str | None, tasks: Sequence[str]) -> dict[str, float]:
    """The authors' finetuned accuracies (%) of ``tasks`` for ``arch`` (``ViT-B-32`` or ``ViT-L-14``,
    the backbone's ``arch``); a one-line error for another model or a task outside the paper's eight."""
    if arch not in FINETUNED_ACCURACY:
        raise ConfigError(f"normalizers: paper: the paper has finetuned accuracies for the CLIP architectures "
                          f"{', '.join(FINETUNED_ACCURACY)} only (model.backbone.arch is {arch!r}); use normalizers=measured")
    table = FINETUNED_ACCURACY[arch]
    missing = [t for t in tasks if t not in table]
    if missing:
        raise ConfigError(f"normalizers: paper: no paper normalizer for task(s) {', '.join(missing)} ({arch}; the paper's "
                          f"tasks are {', '.join(table)}); use normalizers=measured")
    return {t: table[t] for t in tasks}
