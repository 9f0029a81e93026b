"""holons.eval"""
