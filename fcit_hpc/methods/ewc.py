"""EWC (Kirkpatrick et al., 2017) as a federated continual baseline: one LoRA shared by all clients
(as Finetune), plus (λ/2)·Σ F·(θ − θ*)² in every local loss. At the end of each stage the clients
of its last round compute the diagonal Fisher of their data at the global adapter; the server
averages them (sample-weighted), adds the mean to the running Fisher F and sets the anchor θ* to
the adapter of that stage (online EWC with γ = 1)."""

from fcit_hpc.methods.base import Method


class EWC(Method):
    name = "ewc"
    needs_fisher = True

    @property
    def ewc_lambda(self) -> float:
        return self.cfg.method.ewc_lambda
