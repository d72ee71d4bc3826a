"""Solvers (Caffe's training loop and update rules) and learning-rate policies."""
from .lr_policy import LearningRate
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver, Solver, SolverFiles, get_solver, read_solver_param)

__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "LearningRate", "NesterovSolver",
           "RMSPropSolver", "SGDSolver", "Solver", "SolverFiles", "get_solver",
           "read_solver_param"]
