"""deepalign.bench"""
