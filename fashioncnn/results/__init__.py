"""What sweeps came to: reports (report) and retraining the best configurations (retrain).

Imports fashioncnn.sweep and every layer below it. Imported only by the command line.
"""
