"""record/bpf"""
