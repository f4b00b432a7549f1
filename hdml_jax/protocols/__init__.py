"""Evaluation protocols that drive the normal trainer through configs and workdirs: MLRC's
4-fold cross-validation (``mlrc``) and its report (``mlrc_report``).
"""
