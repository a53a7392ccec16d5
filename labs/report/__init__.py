"""Step 05's report: result files in, tables, figures and one HTML (or Markdown) file out.

The report reads result files only, never live objects, and never imports torch: it
runs wherever the result files are copied (docs/results_format.md). It uses the
torch-free labs.contract, labs.fmt, labs.files and labs.bandwidth.

    loading      every *.json of the folder through labs.contract.load_result
    analysis     one row per run, one per configuration; baselines and efficiency (pandas)
    machines     which configurations ran on which machine (host + device model), and
                 that machine's own step-01 file and interconnect
    narrative    per machine: headline, verdict, the why and the unreliable runs, from
                 the numbers
    environment  step 01's files as tables
    plots        the figures of one machine (matplotlib, Agg)
    render       the context; HTML (jinja2, autoescaped) and Markdown from templates/,
                 whose fixed prose (methodology.j2) both share; the CSV
    output       where the files go, written atomically (labs.files), never over a file
                 that 05 did not write
"""
