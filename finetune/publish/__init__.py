"""Publishing trained models to other tools' formats: :mod:`finetune.publish.bioimageio` writes
bioimage.io model packages (``finetune export RUN DIR --format bioimageio``)."""
