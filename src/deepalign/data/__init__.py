"""deepalign.data"""
