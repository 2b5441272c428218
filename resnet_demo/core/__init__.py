"""The computation: model, capture, metrics, preprocessing, cards, weights, insight, the Explorer service.

Imports neither gradio nor matplotlib nor any drawing; nothing here knows about the page.
"""
