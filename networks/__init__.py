"""The networks of the CIFAR-100 knowledge-distillation benchmark of Tian et
al., "Contrastive Representation Distillation" (ICLR 2020), besides the CIFAR
ResNets: one module per family, with RepDistiller's parameter names so its
released checkpoints load. `network` (the module everything imports) registers
them in NETWORKS; `networks.checkpoint_layouts` reads the benchmark's checkpoints.
"""
# The families take Features, Features4 and their base class from `network`,
# which imports them back at its end; importing it first here makes either
# import order work (`import networks.vgg` before `import network`, or after).
import network  # noqa: F401
