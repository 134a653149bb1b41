"""Training methods as plug-ins: one class per method over `training.methods.base.Method` (ect, edm,
consistency_models: CD/CT/PD, scm: sCT/sCD, meanflow, tcm, toy), with the losses they compute (loss: ECT and EDM;
loss_cm: Consistency Models; scm_loss, meanflow_loss, tcm_loss; loss_compiled: the target pass through a
torch.compile'd network; lpips) and the paper's toy experiment (toy_swissroll).

May import: training.networks, training.checkpoints (teachers), training.compile, torch_utils, dnnlib.
"""
