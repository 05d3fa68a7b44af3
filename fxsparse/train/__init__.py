"""The `fxsparse` application: the training job, its data and models, and the export/flops commands.

The library a user imports into their own loop is `fxsparse` itself; this subpackage is one user of it:

    config.py     TrainConfig and where its values come from (defaults, configs/*.toml, the command line)
    data.py       Fashion-MNIST, CIFAR-10/100, ImageFolder, synthetic: checked, split, deterministic loaders
    models.py     re-exports fxsparse.models, the one model builder (cnn, resnet20, timm, pkg.mod:callable)
    recipe.py     device, threads, seeds, optimizer, lr schedule, the sparsity ramp
    loop.py       one training epoch, one evaluation
    job.py        run(): a whole run, in a few steps
    checkpoint.py the training checkpoint (resume, export)
    summary.py    the end of a run: fold, test, CSR checkpoint, FLOP report, summary.json
    tensorboard.py   --tensorboard logging
    loading.py    a model from a name and a checkpoint (export, flops)
    cli.py        the `fxsparse` command: train | export | flops
"""

from .config import TrainConfig
from .job import run

__all__ = ["TrainConfig", "run"]
