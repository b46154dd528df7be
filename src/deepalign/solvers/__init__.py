"""deepalign.solvers"""
