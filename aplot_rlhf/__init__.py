"""aplot_rlhf: reward models trained with APLOT and PPO alignment, on DeepSpeed."""
__version__ = "0.1.0"
