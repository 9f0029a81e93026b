"""holons.anatomy"""
