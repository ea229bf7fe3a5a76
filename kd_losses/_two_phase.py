"""The two-phase schedule that AB and FSP share (the seed's `train_init`).

Phase 'init' (`--init_epochs`, seed 50) trains the student's own parameters
on lambda_kd * (KD loss) alone, without cross-entropy, at 0.1·lr for the
first 60% of its epochs, 0.01·lr for the next 20% and 0.001·lr for the rest
(30/10/10 of the seed's 50). The main schedule then trains with
cross-entropy only: the KD weight is 0 in every main epoch.

As in the seed, both phases step one SGD optimiser (Nesterov, as the main
schedule's), so the init phase's momentum carries into the first main steps,
and the init phase steps every student parameter: the classifier, which the
KD loss does not reach, gets a zero gradient (the seed adds 0 * CE for this),
so weight decay and momentum move it through the init epochs.

A KD loss with learnable connectors (AB between maps of different shapes)
trains them in the 'init' phase with the student, on that same optimiser;
the main phase, which does not use the KD loss, leaves them as that phase
left them (no gradient: no update; they are saved with the distiller).

This module starts with '_', so the package does not import it as a method.
"""
from functools import partial

from .registry import Distiller, Flag, PretrainPhase

INIT_FLAGS = {'init_epochs': Flag(int, 'epochs of the KD-only student initialisation phase '
                                       '(AB, FSP)', positive=True, epochs_of=200,
                                       phase='init')}
INIT_DEFAULTS = {'init_epochs': 50}


def init_lr_scale(epoch, init_epochs):
    """lr multiplier of init-phase epoch `epoch` (from 1). Milestones are
    round(0.6·E) and round(0.8·E) (Python's round: halves to even); E=50
    gives the seed's 30/10/10, and short phases keep every step (E=2: 0.1,
    0.01)."""
    first, second = round(init_epochs * 0.6), round(init_epochs * 0.8)
    return 0.1 if epoch <= first else 0.01 if epoch <= second else 0.001


class InitThenCE(Distiller):
    """Wraps a distiller `kd` (forward(s, t, batch) -> KD loss): its loss
    drives the 'init' phase, and the main schedule is cross-entropy only."""

    def __init__(self, kd):
        super().__init__()
        self.kd = kd

    def forward(self, s, t, batch):
        return self.kd(s, t, batch)

    def pretrain_phases(self, ctx):
        if ctx.student is None:
            raise ValueError(f'{ctx.args.kd_mode}: the init phase trains the student, '
                             'so Context.student must be the student network')
        lambda_kd, epochs = ctx.args.lambda_kd, ctx.args.init_epochs

        def init_loss(s, t, batch):  # no cross-entropy in this phase
            return lambda_kd * self(s, t, batch)

        connectors = [p for p in self.kd.parameters() if p.requires_grad]
        return [PretrainPhase(name='init', epochs=epochs,
                              lr_scale=partial(init_lr_scale, init_epochs=epochs),
                              params=list(ctx.student.parameters()) + connectors, loss=init_loss,
                              train_modules=(ctx.student, self.kd), shares_main_optimizer=True)]

    def learnable_parameters(self):
        # The main phase is cross-entropy alone: the connectors sit in the shared
        # optimiser (through the init phase) but get no gradient there, so stay as they are.
        return []

    def kd_weight(self, epoch, epochs):
        return 0.0
