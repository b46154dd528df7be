"""deepalign.zoo"""
