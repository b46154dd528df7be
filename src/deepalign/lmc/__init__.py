"""deepalign.lmc"""
