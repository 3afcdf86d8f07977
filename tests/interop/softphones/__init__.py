"""Real softphones (baresip, linphonec) driven headless against ``kx-sipd serve``.

``server`` runs kx-sipd with a temporary database, ``carrier`` plays the carrier
trunk (SIPp UAS plus an RTP socket of the test's own), ``rtp`` reads and writes
RTP, and ``baresip``/``linphone`` configure and drive the clients exactly as the
customer's guide §4 tells an integrator to (username, password, domain
sip.kx21.com, UDP, realm left to the 401, PCMU/PCMA only), each in a temporary
HOME with no sound card.
"""
