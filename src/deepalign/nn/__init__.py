"""deepalign.nn"""
