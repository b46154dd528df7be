"""deepalign.training"""
