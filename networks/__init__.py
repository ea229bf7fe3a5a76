"""The networks of the CIFAR-100 knowledge-distillation benchmark of Tian et
al., "Contrastive Representation Distillation" (ICLR 2020): one module per
family (`resnet`: the CIFAR ResNets, with the original zoo's parameter names;
the others with RepDistiller's, so its released checkpoints load), on the
features and base class of `base`. `network` (the module everything imports)
registers them in NETWORKS; `checkpoint_layouts` reads the benchmark's
checkpoints.
"""
